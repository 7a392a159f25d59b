"""One process of the 2-process test (tests/test_multiprocess.py); not collected by pytest."""

import os
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main(coordinator: str, process_id: int, ckpt: str, out: str) -> None:
    import numpy as np
    from flax import nnx
    from jax.experimental import multihost_utils

    from jaxrlvr.models import load_hf_checkpoint, save_hf_checkpoint
    from jaxrlvr.sharding import make_mesh

    jax.distributed.initialize(coordinator, num_processes=2, process_id=process_id)
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    mesh = make_mesh((1, 4, 2))
    model = load_hf_checkpoint(ckpt, mesh=mesh)
    embed = model.embed[...]
    assert not embed.is_fully_addressable  # really spread over both processes
    ids = np.load(os.path.join(out, "ids.npy"))
    gd, state = nnx.split(model)
    with jax.set_mesh(mesh):
        logits = jax.jit(lambda s, x: nnx.merge(gd, s)(x))(state, ids)
    logits = multihost_utils.process_allgather(logits, tiled=True)
    if process_id == 0:
        np.save(os.path.join(out, "logits.npy"), np.asarray(logits))
    save_hf_checkpoint(model, os.path.join(out, "export"))  # gathers; process 0 writes
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
