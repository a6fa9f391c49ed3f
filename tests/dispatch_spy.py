"""Watching the aten ops inside longalign's custom ops.

A TorchDispatchMode around a call sees each custom op as one call, and nothing of its body
(the body runs while the mode is being dispatched). `spy_inside(monkeypatch, Mode)` runs the
kernel layer's host passes under a fresh `Mode` instead, so every matmul and allocation of the
fused cross-entropy (forward and backward) is seen.
"""
from longalign_ops.kernels import weighted_cross_entropy


def spy_inside(monkeypatch, mode_cls):
    real = weighted_cross_entropy.linear_cross_entropy_pass

    def watched(*args, **kwargs):
        with mode_cls():
            return real(*args, **kwargs)

    monkeypatch.setattr(weighted_cross_entropy, "linear_cross_entropy_pass", watched)
