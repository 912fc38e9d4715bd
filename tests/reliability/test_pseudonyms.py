"""Keyed pseudonyms: a site secret (created on first use, never in outputs), HMAC not plain hash."""

from __future__ import annotations

import hashlib
import logging
import stat

import pytest

from medseg.errors import ConfigError
from medseg.pseudonyms import pseudonym, secret_file, site_secret


def test_same_id_two_secrets_unrelated_and_stable():
    a, b = bytes(range(32)), bytes(range(1, 33))
    assert pseudonym("12345678", a) == pseudonym("12345678", a)
    assert pseudonym("12345678", a) != pseudonym("12345678", b)
    # unrelated: the two pseudonyms share no more hex digits than chance (~1 in 16 per digit)
    same = sum(x == y for x, y in zip(pseudonym("12345678", a)[1:], pseudonym("12345678", b)[1:], strict=True))
    assert same <= 5
    assert pseudonym("12345679", a) != pseudonym("12345678", a)


def test_brute_force_over_ids_needs_the_secret():
    """Hashing every candidate ID (what recovered 8-digit IDs from the old sha256 ids) finds nothing
    without the secret; with it, the pseudonym is found -- the secret is what protects the ID."""
    secret = bytes.fromhex("ab" * 32)
    target = pseudonym("00001234", secret)
    candidates = [f"{i:08d}" for i in range(0, 2000)]
    plain = {"P" + hashlib.sha256(f"medseg:{c}".encode()).hexdigest()[:16] for c in candidates}
    assert target not in plain
    guessed = bytes.fromhex("cd" * 32)
    assert target not in {pseudonym(c, guessed) for c in candidates}
    assert target in {pseudonym(c, secret) for c in candidates}


def test_secret_created_once_owner_only_with_a_warning(caplog):
    path = secret_file()
    assert not path.exists()
    with caplog.at_level(logging.WARNING, logger="medseg.pseudonyms"):
        first = site_secret()
    assert path.is_file() and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert str(path) in caplog.text and "keep it" in caplog.text
    assert site_secret() == first and len(first) == 32


def test_environment_secret_wins_and_bad_secrets_are_clear(monkeypatch):
    monkeypatch.setenv("MEDSEG_SITE_SECRET", "11" * 32)
    assert site_secret() == bytes.fromhex("11" * 32)
    assert not secret_file().exists()
    monkeypatch.setenv("MEDSEG_SITE_SECRET", "not hex")
    with pytest.raises(ConfigError, match="MEDSEG_SITE_SECRET: the site secret must be hex"):
        site_secret()
    monkeypatch.setenv("MEDSEG_SITE_SECRET", "11" * 4)
    with pytest.raises(ConfigError, match="at least 16"):
        site_secret()


def test_the_secret_never_appears_in_import_outputs(tmp_path):
    import numpy as np
    import SimpleITK as sitk
    from conftest import make_affine
    from test_io import write_dicom_series

    from medseg.cli import main
    from medseg.io import Geometry

    arr = np.zeros((8, 8, 4), dtype=np.int16)
    image = sitk.GetImageFromArray(arr.transpose(2, 1, 0).copy())
    Geometry.from_affine(make_affine("lps", spacing=(1, 1, 2)), arr.shape).apply_to(image)
    (tmp_path / "in" / "a").mkdir(parents=True)
    write_dicom_series(image, tmp_path / "in" / "a", modality="CT", patient_id="SECRET-123")
    assert main(["import", "dicom", str(tmp_path / "in"), "--out", str(tmp_path / "m.csv"),
                 "--map-file", str(tmp_path / "map.csv")]) == 0  # fmt: skip
    secret_hex = secret_file().read_text().strip()
    for out in (tmp_path / "m.csv", tmp_path / "map.csv"):
        text = out.read_text()
        assert secret_hex not in text and "SECRET-123" not in text


def test_cli_two_site_secrets_give_unrelated_case_ids_and_no_secret_in_outputs(tmp_path):
    """`medseg import dicom` as a subprocess under two site secrets: the same patient gets two
    unrelated case ids, and neither the secret nor the PatientID appears in any output."""
    import csv
    import os
    import subprocess
    import sys

    import numpy as np
    import SimpleITK as sitk
    from conftest import make_affine
    from test_io import write_dicom_series

    from medseg.io import Geometry

    arr = np.zeros((8, 8, 4), dtype=np.int16)
    image = sitk.GetImageFromArray(arr.transpose(2, 1, 0).copy())
    Geometry.from_affine(make_affine("lps", spacing=(1, 1, 2)), arr.shape).apply_to(image)
    (tmp_path / "in" / "Doe_John_12345678").mkdir(parents=True)
    write_dicom_series(image, tmp_path / "in" / "Doe_John_12345678", modality="CT", patient_id="12345678")
    ids = []
    for secret in ("a1" * 32, "b2" * 32):
        out = tmp_path / secret[:2]
        out.mkdir()
        env = {**os.environ, "MEDSEG_SITE_SECRET": secret}
        proc = subprocess.run([sys.executable, "-m", "medseg.cli", "import", "dicom", str(tmp_path / "in"),
                               "--out", str(out / "m.csv"), "--map-file", str(out / "map.csv")],
                              capture_output=True, text=True, env=env, check=False)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        with (out / "m.csv").open() as fh:
            row = next(csv.DictReader(fh))
        ids.append(row["case_id"])
        everything = proc.stdout + proc.stderr + (out / "m.csv").read_text() + (out / "map.csv").read_text()
        assert secret not in everything and secret.upper() not in everything
        # the PatientID and the folder name appear only where the user asked (the folder map) or
        # where the files are (the manifest's path columns), never in an id or a message
        assert "12345678" not in row["case_id"] + row["patient_id"] + proc.stdout.replace(str(tmp_path), "") + proc.stderr
    assert ids[0] != ids[1]
    same = sum(x == y for x, y in zip(ids[0], ids[1], strict=False))
    assert same <= len(ids[0]) // 2
    assert "Doe" not in ids[0] and "12345678" not in ids[0]
