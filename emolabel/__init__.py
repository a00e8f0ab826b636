"""emolabel: label huge photo archives with a Keras image classifier.

This package is the roof: the `emolabel` command line (`emolabel.cli`), the embedded Redis and
local worker it starts (`emolabel.embedded`), and Flower and metrics set-up (`emolabel.ops`). What
every part shares lives at the bottom, in `core`; the ledger in `db`, the model in `training`, the
archive scan in `producer`, the queue consumers in `worker` (see the README's Layout).
"""

__version__ = "0.1.0"
