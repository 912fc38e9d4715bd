#!/usr/bin/env bash
# Best effort: install Debian's Orthanc and its DICOMweb plugin for the PACS tests (tests/pacs/).
# Never fails the build: without Orthanc those tests skip with a reason. The system service is
# not started (the tests start their own Orthanc on free loopback ports).
if command -v Orthanc >/dev/null 2>&1 && dpkg -s orthanc-dicomweb >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure_orthanc: not root or no apt-get; the PACS tests will be skipped"
  exit 0
fi
echo "ensure_orthanc: installing orthanc and orthanc-dicomweb (Debian packages)"
# policy-rc.d 101: the package scripts must not start the system service
policy=/usr/sbin/policy-rc.d
created=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && created=1
fi
(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc orthanc-dicomweb) >/tmp/medseg-orthanc-apt.log 2>&1 \
  || echo "ensure_orthanc: apt-get failed (see /tmp/medseg-orthanc-apt.log); the PACS tests will be skipped"
if [ "$created" = 1 ]; then rm -f "$policy"; fi
exit 0
