"""The emolabel command line."""
