"""emolabel: label huge photo archives with a Keras image classifier.

The package holds what every part shares: the settings object and the error hierarchy, plus the
command line. The model lives in `training`, the queue consumers in `worker`, the archive scanners
in `producer` and the ledger in `db`.
"""

__version__ = "0.1.0"
