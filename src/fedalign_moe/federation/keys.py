"""Wire keys of the messages between server and clients, defined once (kebab-case, as in Flower)."""

ARRAYS = "arrays"  # ArrayRecord: the trainable parameters
CONFIG = "config"  # ConfigRecord: round instructions
METRICS = "metrics"  # MetricRecord: what a client reports

RUN_CONFIG = "run-config"  # the run's Config as JSON: clients rebuild data and model from it
SERVER_ROUND = "server-round"
PROXIMAL_MU = "proximal-mu"  # set by Flower's FedProx

NUM_EXAMPLES = "num-examples"  # Flower's weighting key
PARTITION_ID = "partition-id"
TRAIN_LOSS = "train-loss"
TRAIN_STEPS = "train-steps"
TRAIN_TOKENS = "train-tokens"  # non-padding tokens of the local training passes
TRAIN_SECONDS = "train-seconds"  # wall time of local training
LOCAL_ACCURACY = "local-accuracy"  # the client's model after local training, on its own test split
LOCAL_LOSS = "local-loss"
LOCAL_TEST_EXAMPLES = "local-test-examples"
ROUTING_P = "routing-p"  # mean router probability per (layer, expert), flattened [L*E]
ROUTING_N = "routing-n"  # top-k selections per (layer, expert), flattened [L*E]
FEDMOE_HELD = "fedmoe-held"  # FedMoE: 1 for the experts of the client's sub-MoE, flattened [L*E]
EVAL_ACCURACY = "eval-accuracy"
EVAL_LOSS = "eval-loss"
