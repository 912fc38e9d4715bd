"""Bad-input behaviour of the CLI (a package, so that its conftest does not shadow ``tests/conftest.py``)."""
