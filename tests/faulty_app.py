"""A ClientApp whose clients fail on purpose, for the failing-client tests (a fixture, not a product option).

In round r, partitions RAISE[r] raise an error and partitions HANG[r] sleep HANG_SECONDS before
answering; everyone else runs this package's real client (``client_app.train_round``).
"""

import os
import time

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedalign_moe.federation import client_app, protocol

RAISE = {1: {1, 4}, 2: {2}, 3: {0}}  # a third of 6 clients in round 1
HANG = {1: {5}}  # in round 1, whose timeout must cover the client processes' start anyway: no extra wait
HANG_SECONDS = float(os.environ.get("FAULTY_HANG_SECONDS", "60"))

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    ins = protocol.read_instruction(msg.content)
    pid = int(context.node_config[protocol.PARTITION_ID])
    if pid in RAISE.get(ins.server_round, ()):
        raise RuntimeError(f"partition {pid} fails on purpose in round {ins.server_round}")
    if pid in HANG.get(ins.server_round, ()):
        time.sleep(HANG_SECONDS)
    return Message(content=client_app.train_round(ins, context), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return client_app.evaluate_global(msg, context)
