"""Queue and task names, defined once (imports nothing of the project, like ``errors``).

Producers send by these names without importing the worker's task modules; the worker
registers its tasks under them and routes by queue.
"""

from __future__ import annotations

CPU_QUEUE = "cpu"
GPU_QUEUE = "gpu"
TRAINING_QUEUE = "training"
INFERENCE_QUEUES = (CPU_QUEUE, GPU_QUEUE)
QUEUES = (*INFERENCE_QUEUES, TRAINING_QUEUE)

CLASSIFY_TASK = "worker.tasks.inference.classify_batch"
TRIAL_TASK = "worker.tasks.training.run_trial"
PING_TASK = "worker.tasks.ops.ping"
