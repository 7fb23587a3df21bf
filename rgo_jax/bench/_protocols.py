"""The paper protocols a named ``--benchmark`` runs unless a flag or a config file says
otherwise: the Config fields of ``benchmarks/configs/<benchmark>.json`` (kept equal to
those files by a test)."""

from __future__ import annotations

from typing import Any

__all__ = ["PROTOCOLS"]

_MNIST = {
    "methods": ["rgo", "sgd", "stl"],
    "model": "mlp",
    "hidden": [256, 256],
    "num_tasks": 20,
    "steps_per_task": 1000,
    "batch_size": 10,
    "learning_rate": 0.1,
    "alpha": 0.01,
    "consolidation_batches": 1000,
    "seeds": [0, 1, 2, 3, 4],
}
_ALEXNET = {
    "methods": ["rgo", "sgd", "stl", "ewc", "owm", "gpm", "agem"],
    "model": "alexnet",
    "hidden": [256, 256],
    "steps_per_task": 500,
    "batch_size": 10,
    "learning_rate": 0.03,
    "alpha": 0.01,
    "consolidation_batches": 50,
    "seeds": [0, 1, 2, 3, 4],
    "vmap_seeds": False,
    "chunk_steps": 10,
    "scan_unroll": 10,
    "input_projection": True,
    "method_options": {"ewc_lambda": 10, "owm_alpha": 10, "gpm_threshold": 0.97, "agem_batch": 10},
}
_RESNET = {
    "methods": ["rgo"],
    "model": "resnet18",
    "width": 64,
    "num_tasks": 20,
    "steps_per_task": 2000,
    "batch_size": 10,
    "learning_rate": 0.03,
    "alpha": 0.01,
    "consolidation_batches": 50,
    "seeds": [0, 1, 2, 3, 4],
}

#: benchmark -> its protocol's Config fields (JSON values).
PROTOCOLS: dict[str, dict[str, Any]] = {
    "permuted_mnist": {"benchmark": "permuted_mnist", **_MNIST},
    "rotated_mnist": {"benchmark": "rotated_mnist", **_MNIST},
    "split_cifar10": {"benchmark": "split_cifar10", **_ALEXNET, "num_tasks": 5},
    "multi_dataset": {"benchmark": "multi_dataset", **_ALEXNET, "num_tasks": 3},
    "split_cifar100": {
        "benchmark": "split_cifar100",
        **_RESNET,
        "vector_chunk": 10,
        "eval_batch_size": 500,
    },
    "split_miniimagenet": {
        "benchmark": "split_miniimagenet",
        **_RESNET,
        "vector_chunk": 5,
        "eval_batch_size": 200,
    },
}
