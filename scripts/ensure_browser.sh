#!/usr/bin/env bash
# Best effort: install Debian's chromium + chromedriver for the report's browser test.
# Never fails the build: without a browser that test skips with a reason.
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure_browser: not root or no apt-get; the browser test will be skipped"
  exit 0
fi
echo "ensure_browser: installing chromium and chromium-driver (Debian packages)"
(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/tmp/medseg-apt.log 2>&1 \
  || echo "ensure_browser: apt-get failed (see /tmp/medseg-apt.log); the browser test will be skipped"
exit 0
