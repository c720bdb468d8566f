"""symatomic: exactly symmetric machine-learning models of atoms, in metatomic's formats."""

__version__ = "0.1.0"
