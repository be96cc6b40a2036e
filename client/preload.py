"""Imported by every Ray worker as it starts (Ray's `preload_python_modules`, which
snowfed.sim.run.runner sets when it starts Ray): the imports a simulation's actors need are done
before the first messages reach them, not while those messages wait.

torch.optim imports torch._dynamo at an optimiser's first step (about 2.5 s here), and Ray
imports Flower's actor class when the simulation creates its actors (0.9 s), so both are
imported here as well.
"""

import torch._dynamo  # noqa: F401
from flwr.simulation.ray_transport import ray_actor  # noqa: F401

import snowfed.client.app  # noqa: F401
