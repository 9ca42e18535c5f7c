"""One package per synthesis method (see registry.py and interface.py). Import nothing here: the
API imports the method packages' specs and must not pull in numpy-heavy or torch modules on the way."""
