"""A real PACS for the tests: Debian's Orthanc with its DICOMweb plugin and its DICOM port
(C-FIND / C-GET / C-STORE allowed for :data:`CALLING_AE`), started on free loopback ports with
a throw-away storage folder and a test user, stopped after the module. Skipped, with the reason, where Orthanc or the plugin is not installed
(``scripts/ensure_orthanc.sh`` installs them; ``make test`` runs it)."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/dicom_helpers.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "inference"))  # infer_helpers.py

USER, PASSWORD = "medseg-test", "not-a-real-password"
AET, CALLING_AE = "ORTHANC", "MEDSEG_TEST"  # Orthanc's AE title, the one medseg calls from


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dicomweb_plugin() -> str | None:
    """The DICOMweb plugin's shared library, as the package lists it."""
    try:
        listing = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        listing = ""
    libraries = [line for line in listing.splitlines() if "libOrthancDicomWeb.so" in line and Path(line).is_file()]
    return min(libraries, key=len) if libraries else None


class Orthanc:
    """One Orthanc process (``start``/``stop`` keep its ports and storage) and a small REST client."""

    def __init__(self, root: Path, binary: str, plugin: str) -> None:
        self.root, self.binary = root, binary
        self.http_port, self.dicom_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb_url = f"{self.url}/dicom-web"
        self.config = root / "orthanc.json"
        self.log = root / "orthanc.log"
        self.config.write_text(json.dumps({
            "Name": "medseg-test", "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "index"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": AET,
            # DIMSE (tests/pacs/test_pacs_dimse.py): medseg's AE may C-FIND, C-GET and C-STORE;
            # C-GET answers on medseg's association, so Orthanc needs no host or port for it
            "DicomModalities": {CALLING_AE: [CALLING_AE, "127.0.0.1", 104]}, "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True, "DicomAlwaysAllowFind": True, "DicomAlwaysAllowGet": True,
            "DicomScuTimeout": 10,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
            "Plugins": [plugin], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "SaveJobs": False, "StorageCompression": False, "OverwriteInstances": False,
        }, indent=1))  # fmt: skip
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        handle = open(self.log, "ab")  # noqa: SIM115 - the process owns it
        self.process = subprocess.Popen([self.binary, str(self.config)], stdout=handle, stderr=subprocess.STDOUT,
                                        cwd=self.root)  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited ({self.process.returncode}): {self.log.read_text()[-2000:]}")
            try:
                self.get("/system")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        raise RuntimeError(f"Orthanc did not answer /system within 60 s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def _request(self, path: str, data: bytes | None = None, method: str | None = None) -> bytes:
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())
        if data is not None:
            request.add_header("Content-Type", "application/dicom")
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.read()

    def get(self, path: str):
        return json.loads(self._request(path))

    def get_bytes(self, path: str) -> bytes:
        return self._request(path)

    def upload(self, files) -> None:
        """Each file through Orthanc's REST ``/instances`` (not through medseg)."""
        for path in files:
            self._request("/instances", Path(path).read_bytes(), "POST")

    def instance_count(self) -> int:
        return int(self.get("/statistics")["CountInstances"])

    def seg_instances(self) -> list[str]:
        """Orthanc ids of the SEG instances it holds."""
        body = json.dumps({"Level": "Instance", "Query": {"Modality": "SEG"}}).encode()
        request = urllib.request.Request(self.url + "/tools/find", data=body, method="POST")
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read())


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    binary = shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if Path(p).is_file()), None)
    if binary is None:
        pytest.skip("Orthanc is not installed (scripts/ensure_orthanc.sh installs Debian's orthanc as root)")
    plugin = dicomweb_plugin()
    if plugin is None:
        pytest.skip("Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")
    server = Orthanc(tmp_path_factory.mktemp("orthanc"), binary, plugin)
    server.start()
    try:
        yield server
    finally:
        server.stop()
