"""Labeling throughput, four ways, in one run on the same images, model and cores.

    python -m bench throughput                                  # crops 2000 and photos 300
    python -m bench throughput --kind crops --images 20000      # a long run: is worker RSS flat?
    python -m bench throughput --folder ~/Pictures/2024         # your own images
    python -m bench throughput --kind both --crops 20 --photos 3 --photo-size 800x600  # smoke
    python -m bench throughput --workload faces --scenes 24     # face scenes, a face model

--workload images (the default) is everything below; --workload faces measures camera-size
scenes with 0 to 8 real faces at known boxes through a face model instead (the fer model,
imported with subject: face): (b) decode+detect floor, (b') the same in the worker's layout,
(c) the classifier alone on the face crops, (e) worker.predict.label_face_images, (d) a real
worker job, each in images/s and faces/s with the recall of the known faces (IoU >= 0.5); see
bench/throughput/face_run.py and scenes.py. --photo-size sets the scenes' size, --detect-side
EMOLABEL_FACES__DETECT_SIDE.

Image sets (generated once, cached under CACHE/<kind>-<n>[-<W>x<H>]/ and reused):

  crops    256x256 face crops (training.sample_data.draw_face plus texture at every scale and
           sensor noise), JPEG q90, ~20 KB each, 500 per person folder
  photos   12 MP camera-like JPEGs (4000x3000): a scene drawn at quarter size (gradient sky,
           objects, a face, texture), upscaled, then fine texture and sensor noise at full size,
           JPEG q92, 2-5 MB each, in year/day folders like a camera archive
  --folder an existing folder instead (every regular file below it; (d) scans all of it)

Phases, each on the same files (read once beforehand, so every phase reads the page cache):

  (a) notebook   the notebooks' loop: cv2.imread, cv2.resize to 256x256, model.predict on a
                 batch of one; on the first --notebook-images images only (it is slow)
  (b) decode     the decode floor: preprocess.load_image (TurboJPEG for plain JPEGs, OpenCV for
                 the rest; reduced-scale DCT decoding for large JPEGs, full size for crops), the
                 worker's own decoding, over every image in a thread pool of
                 --floor-threads threads (default: every usable CPU); no model
  (c) model      KerasRunner.predict alone on ready uint8 batches of --batch-size, made from the
                 first --model-images decoded images (whole batches, repeated when fewer; aligned
                 like the worker's, so no copy on the way in), in one
                 process with the framework's default threads (one per CPU), in
                 --precision (float32 by default; (a) is always the notebooks' float32)
  (c') model     the same batches in the worker's layout: as many spawned processes as (d) runs,
                 each with (d)'s model threads, all started together; images/s over the span
                 from the first start to the last finish. The faster of (c) and (c') is the
                 model's limit on these cores.
  (d) emolabel   the product end to end: a fresh EMOLABEL_HOME under OUT, the embedded Redis
                 (ensure_redis), a real Celery worker (start_local_worker; processes, model and
                 decode threads as the settings resolve them unless --concurrency,
                 --model-threads, --decode-threads say otherwise; worker.batch_size and
                 scan.chunk_size / chunk_bytes as given), a benchmark
                 model registered active in SQLite, the real producer (run_scan over the folder,
                 as `emolabel scan` does). Every worker process loads the model when it starts;
                 the bench waits until each has, and the worker labels a small warm-up job;
                 then the clock runs from the first publish to the job's
                 finished_at, which the worker sets in the transaction that commits the
                 last outcome (the harness reads only the job's row, every 0.25 s).

Rounds (--repeat, default 3): the worker is started first, and stopped (SIGSTOP) while the other
phases run, since an idle Celery worker still takes some CPU. Every round measures (b), (c), (a),
(c') and (d) once, in that order. A shared machine drifts by 10% within minutes, so the table
shows, per phase, the round with the median images/s (the JSON keeps every round, and each
round's own ratios). Rounds after the first relabel the same files (`scan --force`), so their
writes are upserts over existing results.

(a)-(c) run in a spawned process per round (TensorFlow is never imported by this one); (d) here.
(d) also records where the machine's CPU time went (/proc/stat): the worker, this process (scan,
watcher), Redis, the rest, and idle, with the idle share at the start, middle and end.
The model is the seeds' CNN (training.model.make_model, 256x256x3, 2 classes) with random
weights, saved as an artifact: speed does not depend on what it learned.

Worker memory during (d): VmHWM of the worker's main and pool processes (reset when the timed job
starts), RSS sampled every 0.5 s and noted at 10%, 50% and 100% of the images: flat means the
100% figure is the 10% one. The worker's log gives the chunks' stage seconds (decode is summed
over threads) and the time between chunks (write, ack, next message: the model idles).

Ratios: (d)/(b), (d)/(c), (d)/(c'), (d)/(a), and (d) over the shared-core bound
1/(1/b + 1/max(c, c')): decoding
and the model each use every core, so one pipeline doing both cannot go faster than that.
The load average is recorded before and after every phase; on a shared machine images/s are only
as good as the CPU that was free, so CPU ms per image (all threads; the worker's processes for
(d)) are given too: they hardly depend on the load.
"""

from bench.throughput.cli import main

__all__ = ["main"]
