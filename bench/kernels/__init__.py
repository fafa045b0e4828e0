"""Compute-kernel benchmarks: ``python -m bench.kernels [--quick] [--out DIR]``, or ``make bench``.

What is measured (the machine is shared and noisy, so every figure is taken side by side with its
baseline in the same run, interleaved and repeated, and the median is reported):

1. Single call: each kernel's Numba and Cython implementations against a plain C99 baseline of
   the same algorithm (``bench/c/<kernel>.c``, built here with ``gcc -O2 -shared -fPIC``, no
   -march, no -ffast-math, called through ctypes) on a fixed input, after warm-up; each round
   calls every implementation once, in an order that rotates from round to round. The ratios
   Numba/C and Cython/C are medians of the per-round ratios. Target: <= 1.25 each. Every
   implementation must return the same result, the pure-Python reference included (checked and
   recorded; any difference is an error).
2. Pure-Python reference: one call on the same input when a small probe predicts it takes less
   than ``python_full_max_s``; otherwise one call on a smaller input of the same shape (fewer
   samples, a coarser grid of the same region, a shorter range), whose time is scaled up linearly
   to the full input, and the report says so. For primes the compiled kernels must be >= 50x
   faster than it.
3. Thread scaling: one call on one thread against two threads each running the same call at the
   same time (``threading.Thread``, released together by a barrier); speed-up = 2 * t1 / t2,
   median over rounds; a call shorter than 0.1 s is repeated in each thread. Target: >= 1.8 for
   Numba and Cython (2 cores); C alongside as the control (ctypes releases the GIL), no target.
4. Through the worker: ``primes.count`` jobs/s drained by ONE ``nsqjobs worker --concurrency 2``
   against TWO ``nsqjobs worker --concurrency 1`` processes, on a private nsqd. Each run fills a
   fresh, paused channel with N identical job envelopes, starts the worker(s), waits until every
   one is connected with RDY > 0, unpauses, and times until depth + in-flight + deferred = 0.
   For the record, no target.

The machine is shared: the cores other processes keep busy (from /proc/stat, less this process
and its children) are recorded for every section. A thread-scaling round measured while they
used more than ``quiet_cores`` is redone, and each worker drain first waits for a quiet machine,
as long as the run has spent less than ``quiet_budget_s`` waiting; after that figures count as
they are, with their load shown next to them.

Kernels (or implementations) that are not there -- no module, no ``bench/c`` file, Cython not
built -- are skipped with a line in the report. Figures go to ``kernels.json`` and ``kernels.md``
in ``--out`` (default ``bench/results``); progress goes to stderr. A full run takes two to three
minutes; ``--quick`` runs fewer rounds and smaller loads (under a minute and a half). Exit
status: 1 if something could not run or the results differ, 2 with ``--strict`` if a target is
missed.

The modules, in the order a run uses them: ``specs`` (settings, targets, inputs), ``cbuild`` (gcc
and ctypes), ``impls`` (loading, agreement), ``load`` (the machine's other load), ``timing`` (1
and 2), ``threads`` (3), ``worker`` (4), ``report`` (the files), ``runner`` (one run), and
``__main__`` (the command line).
"""

from bench.kernels.runner import run

__all__ = ["run"]
