"""What snowfed's ServerApp and ClientApp say to each other, in one place so that the two sides
(and a partner site's client of the same version) cannot drift apart.

Flower owns some of these names: its strategies put `server-round` (and FedProx `proximal-mu`)
in every train and evaluate config, and its simulation gives each node a `partition-id` in its
node config. snowfed's nodes name their partition with the same key in every reply.
"""

# message types beyond Flower's `train` and `evaluate`: <category>.<action>
IDENTIFY = "identify"  # query: which partition (hospital) is this node
PERSONALIZE = "personalize"  # evaluate: fine-tune the final global model, score both
IDENTIFY_TYPE = f"query.{IDENTIFY}"
PERSONALIZE_TYPE = f"evaluate.{PERSONALIZE}"

# keys of the config the server sends
STORE = "store"  # the federation store's path, when the nodes share the server's disk
SEED = "seed"  # the run's seed: every node derives its random streams from it
SERVER_ROUND = "server-round"  # Flower's
NUM_ROUNDS = "num-rounds"  # the run's rounds: where the local lr schedule stands
PROXIMAL_MU = "proximal-mu"  # Flower's FedProx
PERSONALIZE_STEPS = "personalize-steps"

# a node's partition: its node config (Flower's simulation, a SuperNode's --node-config) and,
# under the same key, every reply's metrics
PARTITION_ID = "partition-id"

# where a reply was computed, in a ConfigRecord beside its metrics: the Ray node of the actor that
# ran it (simulation; a SuperNode's replies have none), recorded as the node record's `ray-node`
WHERE = "where"
RAY_NODE = "ray-node"
