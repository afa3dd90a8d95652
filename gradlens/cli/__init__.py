"""The ``gradlens`` command: a thin layer of options and messages over the Python API."""
