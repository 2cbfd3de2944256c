"""A stage on a Flower federation: the project's clients on SuperNodes, its server in a ServerApp.

Flower (``flwr``, the ``flower`` extra) runs a SuperLink that relays messages, SuperNodes that hold the
data, a ServerApp and a ClientApp. Here:

- the **ServerApp** (``server_app.server_app``) runs where the SuperLink runs, in the project folder. It trains the
  stage with the project's own round loop (``training.stages.train_stage``: client sampling, FedAvg, the server
  optimizer, validation, checkpoint, metrics, MLflow run, resume), with one change: the round's clients
  are trained by the SuperNodes that hold them (``FlowerRounds``), so the stage's outputs are those of the
  simulator and later stages, ``compare`` and ``recommend`` do not care which engine trained it;
- each **SuperNode** holds a partition of the users (``--node-config "data-dir=... partition-id=p
  num-partitions=n"``: user u belongs to node u % n). Its **ClientApp** (``client_app.client_app``) receives the
  global weights and the round's users it holds, trains them with the project's client update
  (``federated.client.train_chunk_sequential``: the same loss, negatives and per-client seeds) and sends back only
  their summed update (``federated.server.PartialSum``), its weight and loss: never an interaction.

``launcher.train_on_flower`` is what ``feddmmr train --engine flower`` runs: it writes the Flower app (a
``pyproject.toml`` naming these two apps), starts a SuperLink and ``federation.nodes`` SuperNodes on
127.0.0.1 unless ``federation.superlink`` names a running one, submits the run with ``flwr run`` and
reports the stage's metrics or its error.

The multimodal stages keep a memory per client, which lives with the client's data: each SuperNode keeps
its users' memories (``node_memory.NodeMemories``, in the ``state-dir`` of its node config, beside its
``features-dir`` of item features), fills them at the start of a stage, updates them in every round and
ranks its users' validation and test targets with them (``evaluate_users``). The server holds only a
pointer to the nodes' snapshot (``node_memory.RemoteMemory``), in its resume state and in the
checkpoint's ``memory.safetensors``; the next stage on the same federation continues from it. Stage 1
is validated on the server, which holds the prepared data as every node does.
"""
