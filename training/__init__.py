"""Training and evaluation of the skin-lesion classifier on HAM10000."""
