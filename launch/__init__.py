"""TorchX launchers for the recsys-kd stages (``torchx run launch/components.py:train ...``)."""
