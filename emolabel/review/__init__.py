"""The review page (roof floor): a person accepts or corrects labels in a browser.

auth        who may look and write: basic auth (Flower's user), a printed token, CSRF checks
ranking     the doubt order: uncertain first, then likely mistakes (confident learning)
thumbnails  an image or face crop, read from the confined roots, as a small JPEG
app         the Starlette app: the page, thumbnails by id, the JSON endpoint for verdicts
"""
