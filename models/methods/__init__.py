"""One module per synthesis method. Import nothing here: the API imports models.methods.params
and must not pull in numpy-heavy or torch modules on the way."""
