# syntax=docker/dockerfile:1
# One image for every emolabel service of docker-compose.yml. EXTRA_PACKAGES adds packages to
# it: the GPU workers' image is built with "jax[cuda12]" (and runs EMOLABEL_KERAS_BACKEND=jax).
FROM python:3.11-slim

ARG EXTRA_PACKAGES=""
ARG UID=1000
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2

# A user of its own; the state folder and /models belong to it (named volumes inherit that).
RUN groupadd --gid "${UID}" emolabel \
 && useradd --uid "${UID}" --gid emolabel --create-home --shell /usr/sbin/nologin emolabel \
 && install -d -o emolabel -g emolabel /var/lib/emolabel /var/lib/emolabel/state /models

WORKDIR /src
# The dependencies in a layer of their own, installed from an empty skeleton of the packages,
# so that a change to the code does not download TensorFlow again.
COPY pyproject.toml README.md ./
RUN mkdir emolabel worker producer training db \
 && touch emolabel/__init__.py worker/__init__.py producer/__init__.py training/__init__.py \
    db/__init__.py \
 && pip install ".[postgres]" ${EXTRA_PACKAGES} \
 && pip uninstall --yes emolabel \
 && rm -rf /src/*

COPY pyproject.toml README.md ./
COPY core core
COPY emolabel emolabel
COPY worker worker
COPY producer producer
COPY training training
COPY db db
RUN pip install --no-deps . && rm -rf /src/build

USER emolabel
WORKDIR /var/lib/emolabel
ENV EMOLABEL_HOME=/var/lib/emolabel/state \
    EMOLABEL_MODELS_DIR=/models
CMD ["emolabel", "--help"]
