"""Per-process worker state: database engine, file reader, decode pool and the loaded model.

Created in the child process, never in the parent (TensorFlow and database connections do not
survive fork): when the child starts, by `preload_active_model`, or else on its first task. The
model is loaded once per process behind a lock and reloaded only when the registry's active
version changes; only from under the models folder, and only if `model.keras` and `metadata.json`
still have the hashes the registry recorded (`KerasRunner.from_registry`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from core.errors import ModelError
from core.settings import Settings
from core.storage.reader import Reader
from db.session import make_engine, make_sessionmaker
from training.faces import FaceDetector
from training.trust import ArtifactHashes
from worker.model_runner import KerasRunner
from worker.resources import cpu_has_bfloat16, worker_layout

logger = logging.getLogger(__name__)


class DetectorUnavailable(ModelError):
    """A face model is active and this process cannot load the face detector: the worker stops
    rather than label anything (never whole-image labels from a face model)."""


@dataclass
class ProcessState:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    reader: Reader
    pool: ThreadPoolExecutor
    decode_threads: int = 1  # the pool's threads
    pid: int = field(default_factory=os.getpid)
    _runner: KerasRunner | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _detector: FaceDetector | None = None

    def detector(self) -> FaceDetector:
        """The face detector, built and warmed up once per process (face models only).

        Raises `DetectorUnavailable` when it cannot load: a face model is then never served,
        rather than served on whole images.
        """
        with self._lock:
            if self._detector is None:
                from training.faces import detector_config
                from training.faces.mtcnn import load_mtcnn

                started = time.perf_counter()
                try:
                    detector = load_mtcnn(
                        detector_config(self.settings.faces), backend=self.settings.keras_backend
                    )
                    # One small call traces the networks before two decode threads race to.
                    detector.detect(np.zeros((64, 64, 3), dtype=np.uint8))
                except Exception as error:
                    raise DetectorUnavailable(f"the face detector cannot load: {error}") from error
                logger.info("face detector ready in %.2f s", time.perf_counter() - started)
                self._detector = detector
            return self._detector

    def runner(self, version: str, artifact_path: str) -> KerasRunner:
        """The model for `version`, loading it (once) if it is not the one in memory."""
        with self._lock:
            if self._runner is None or self._runner.version != version:
                from training.runtime import load_keras

                worker = self.settings.worker
                threads = worker_layout(worker).model_threads
                started = time.perf_counter()
                load_keras(self.settings.keras_backend, threads=threads)
                logger.info("loading model %s from %s", version, artifact_path)
                if worker.precision == "bfloat16" and not worker.gpus and not cpu_has_bfloat16():
                    logger.warning("this CPU has no bfloat16 units: bfloat16 will be slower")
                runner = KerasRunner.from_registry(
                    Path(artifact_path),
                    self.settings.models_dir,
                    self._registered_hashes(version, artifact_path),
                    worker.batch_size,
                    worker.precision,
                )
                runner.warm_up()
                logger.info(
                    "model %s ready in %.2f s (%d model threads, %s)",
                    version,
                    time.perf_counter() - started,
                    threads,
                    runner.precision,
                )
                if runner.version != version:
                    logger.warning(
                        "artifact at %s says version %s, registry says %s",
                        artifact_path,
                        runner.version,
                        version,
                    )
                self._runner = runner
            return self._runner

    def _registered_hashes(self, version: str, artifact_path: str) -> ArtifactHashes:
        """The hashes the registry recorded for `version`, which the files must match."""
        from training.registry import registered_hashes

        with self.sessions() as session:
            return registered_hashes(session=session, version=version, artifact_path=artifact_path)


_state: ProcessState | None = None
_state_lock = threading.Lock()


def process_state(settings: Settings) -> ProcessState:
    """This process's state, created on first use (and again in a forked child)."""
    global _state
    with _state_lock:
        if _state is None or _state.pid != os.getpid():
            engine = make_engine(settings.effective_database_url)
            decode_threads = worker_layout(settings.worker).decode_threads
            _state = ProcessState(
                settings=settings,
                engine=engine,
                sessions=make_sessionmaker(engine),
                reader=Reader(
                    max_file_bytes=settings.limits.max_file_bytes,
                    allowed_roots=[os.fsencode(root) for root in settings.worker.allowed_roots],
                    s3=settings.s3,
                ),
                pool=ThreadPoolExecutor(decode_threads, thread_name_prefix="emolabel-decode"),
                decode_threads=decode_threads,
            )
        return _state


def preload_active_model(settings: Settings) -> threading.Thread:
    """Load the registry's active model in the background, as soon as a child process starts.

    The first chunk otherwise pays for importing the framework, loading and tracing (seconds),
    while the queue waits. A background thread keeps the child's start within Celery's start-up
    timeout; a chunk that arrives meanwhile waits on the runner lock. Any failure is only logged:
    the first chunk then loads the model itself, and reports the error against the chunk.
    """

    def load() -> None:
        from training.registry import ensure_active_model

        try:
            state = process_state(settings)
            with state.sessions.begin() as session:
                active = ensure_active_model(
                    session=session, models_dir=settings.models_dir, name=settings.model_name
                )
                version, artifact_path = active.version, active.artifact_path
            if state.runner(version, artifact_path).subject == "face":
                state.detector()
        except Exception as error:
            logger.info("model not preloaded (%s); the first chunk loads it", error)

    thread = threading.Thread(target=load, name="emolabel-preload", daemon=True)
    thread.start()
    return thread


def forget_inherited_state() -> None:
    """In a freshly forked child: drop the parent's connections without closing them."""
    global _state
    if _state is not None and _state.pid != os.getpid():
        _state.engine.dispose(close=False)
        _state = None
