"""End-to-end latency and accuracy parity of every backend against the PyTorch fp32 reference.

``test_latency[<backend>-b<batch>]`` times ``predict`` (RGB images in, full-size labels out, normalisation and the
argmax included) on real evaluation images at the config's crop size; on CUDA the timed call ends in
``torch.cuda.synchronize()``. Its ``extra_info`` holds the peak memory one call adds (``bench.memory``), the
FLOPs of one image, from which the report derives MFU, and on a GPU of ``bench.metrics.GPUS`` the ideal time of
the call (``bench.roofline``), which the report sets the latency against.

``test_accuracy[<backend>]`` runs the backend over the whole evaluation set and fails when its mIoU differs from
the reference's by more than its precision's tolerance (``bench.metrics.TOLERANCE_POINTS``), or the relative error
of its semantic logits against the reference's (‖L − L_ref‖ / ‖L_ref‖ over all images) exceeds
``bench.metrics.LOGIT_TOLERANCE``: the logits say how close a fast path's numbers are even where the labels cannot
(a randomly initialised student may predict one class everywhere). ``extra_info`` holds mIoU, delta, argmax
agreement and the logit error for the report.

What runs is set by the ``QD_BENCH_*`` variables (``bench.settings``); ``python -m bench`` sets them from its
arguments. Under ``--benchmark-disable`` each test runs its backend once, as a correctness check.
"""
from __future__ import annotations

import pytest
import torch

from bench.backends import (CAPTURED_IN_COMPILE, CAPTURED_IN_FIRST_CALL, EXTERNALLY_TIMED, FOREIGN_ALLOCATOR,
                            HOST_IO, REFERENCE, BackendSpec, BenchSession, as_tensor, get_session, select_backends,
                            selected_here, unavailable_reason)
from bench.memory import measure_peak
from bench.metrics import Parity, check_parity
from bench.settings import settings_from_env
from qd_core.metrics import ConfusionMatrix

SETTINGS = settings_from_env()
NATIVE_ITERS = 20  # timed passes per batch size of the externally timed backends
SPECS = [spec for spec in select_backends(SETTINGS.backends) if selected_here(spec, SETTINGS)]
LATENCY_PARAMS = [pytest.param(spec, batch, id=f"{spec.name}-b{batch}") for spec in SPECS
                  for batch in SETTINGS.batches]
ACCURACY_PARAMS = [pytest.param(spec, id=spec.name) for spec in SPECS]


@pytest.fixture(scope="module")
def session() -> BenchSession:
    return get_session(SETTINGS)


def _require(spec: BackendSpec) -> None:
    reason = unavailable_reason(spec, SETTINGS)
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("spec, batch", LATENCY_PARAMS)
def test_latency(benchmark, session: BenchSession, spec: BackendSpec, batch: int):
    _require(spec)
    seg = session.segmenter(spec)
    images = session.inputs(batch)
    cuda = SETTINGS.device == "cuda"

    def step():
        labels = seg.predict(images)
        if cuda:
            torch.cuda.synchronize()
        return labels

    benchmark.group = f"latency b{batch}"
    benchmark.extra_info.update(session.info(), kind="latency", backend=spec.name, precision=spec.precision,
                                description=spec.description, batch=batch,
                                ideal_ms=session.ideal_ms(batch, spec.precision))
    if cuda and spec.name in HOST_IO:
        benchmark.extra_info.update(timing_note="includes copying the images to the GPU and the outputs back "
                                                "(this backend takes and returns host memory; the others' images "
                                                "and labels stay on the GPU)")
    if spec.name in EXTERNALLY_TIMED:
        # Another process: its own clock times each pass (bench.native); the report reads these samples.
        if not benchmark.disabled:
            benchmark.extra_info.update(samples_s=seg.timed_passes(images, warmup=3, iters=NATIVE_ITERS),
                                        peak_mem_mib=None, memory_method="n/a: another process")
        labels = as_tensor(benchmark.pedantic(seg.predict, args=(images,), rounds=1, iterations=1))
        assert tuple(labels.shape) == (batch, *session.size)
        return
    if not benchmark.disabled:
        if cuda and spec.name in CAPTURED_IN_FIRST_CALL:
            # Warm-up and capture: the graph's pool keeps this peak for every replay.
            _, peak_mib, method = measure_peak(SETTINGS.device, step)
            method = "CUDA: peak of the call that captured the graph (its pool keeps it)"
        else:
            step()  # compilation, autotuning and allocator growth stay out of the measurement
            replayed = cuda and spec.name in CAPTURED_IN_COMPILE
            if replayed:
                step()  # Inductor's CUDA graphs warm up in the first call and record in the second: measure a replay
            _, peak_mib, method = measure_peak(SETTINGS.device, step)
            if replayed:
                method = "CUDA: torch.cuda.max_memory_allocated of a replay (the graph's pool, filled at capture, " \
                         "not counted)"
        if cuda and spec.name in FOREIGN_ALLOCATOR:
            peak_mib, method = None, "n/a: allocated outside torch"
        benchmark.extra_info.update(peak_mem_mib=peak_mib, memory_method=method)
    labels = as_tensor(benchmark(step))
    assert tuple(labels.shape) == (batch, *session.size)


@pytest.mark.parametrize("spec", ACCURACY_PARAMS)
def test_accuracy(benchmark, session: BenchSession, spec: BackendSpec):
    _require(spec)
    reference = session.reference_predictions()
    # Named before the timed pass: pytest-benchmark keeps the entry even when the test fails after it, and the
    # report must see an accuracy entry (without numbers), not take it for a kernel microbenchmark.
    benchmark.group = "accuracy"
    benchmark.extra_info.update(session.info(), kind="accuracy", backend=spec.name, precision=spec.precision,
                                description=spec.description, reference=REFERENCE.name)
    # One pass over the evaluation set; its time is recorded but the report reads only extra_info.
    predictions = benchmark.pedantic(session.predict_all, args=(spec,), rounds=1, iterations=1)
    labels = session.eval_set.labels
    num_classes = int(session.cfg.model.head.num_classes)

    matrix, ref_matrix = ConfusionMatrix(num_classes), ConfusionMatrix(num_classes)
    matrix.update(predictions, labels)
    ref_matrix.update(reference, labels)
    logits = session.logits_all(spec)
    ref_logits = session.reference_logits()
    logit_error = (None if logits is None else
                   float((logits.double() - ref_logits.double()).norm() / ref_logits.double().norm()))
    parity = Parity(spec.name, spec.precision, matrix.miou(), ref_matrix.miou(),
                    agreement=float((predictions == reference).double().mean()), logit_rel_error=logit_error)
    benchmark.extra_info.update(images=len(session.eval_set), miou=parity.miou,
                                reference_miou=parity.reference_miou, delta_points=parity.delta_points,
                                tolerance_points=parity.tolerance_points, agreement=parity.agreement,
                                logit_rel_error=logit_error, passed=parity.passed)
    check_parity(parity)
