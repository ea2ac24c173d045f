"""The version, in a module of its own: modules inside the package read it here, never from the package face."""
__version__ = "0.1.0"
