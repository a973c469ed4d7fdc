"""Two NCCL processes on this machine's GPUs: does a communicator form, and does an all-reduce and an
in-place reduce-scatter give the right sums? Launch: torchrun --nproc-per-node 2 bench/nccl_pair.py [--gpu G]
(--gpu puts every process on GPU G: NCCL may refuse two ranks on one GPU, which this reports)."""
import sys

import ml_dtypes
import numpy as np

from llmqgen.runtime import driver, nccl
from llmqgen.runtime.dist import dist_env, share_bytes

env = dist_env()
if env is None:
    sys.exit("launch with torchrun --nproc-per-node 2 (or mpirun/srun)")
gpu = int(sys.argv[sys.argv.index("--gpu") + 1]) if "--gpu" in sys.argv else env.local_rank
dev = driver.open_device(gpu)
stream = driver.stream_create()
uid = share_bytes(env, nccl.unique_id)
try:
    comm = nccl.Comm(uid, env.world_size, env.rank)
except nccl.NcclError as e:
    print(f"rank {env.rank} on GPU {gpu}: no communicator: {e}", flush=True)
    sys.exit(3)
n = 1 << 20
a = np.full(n, env.rank + 1, np.float32)
buf = driver.alloc(a.nbytes)
driver.memcpy_htod(buf, a.ctypes.data, a.nbytes, stream)
comm.all_reduce(buf, buf, n, "fp32", "sum", stream)
driver.memcpy_dtoh(a.ctypes.data, buf, a.nbytes, stream)
driver.stream_synchronize(stream)
want = env.world_size * (env.world_size + 1) / 2
g = np.arange(n, dtype=np.float32).astype(ml_dtypes.bfloat16) * (env.rank + 1)
driver.memcpy_htod(buf, g.ctypes.data, g.nbytes, stream)
part = n // env.world_size
comm.reduce_scatter(buf, buf + env.rank * part * 2, part, "bf16", "sum", stream)
out = np.empty(part, ml_dtypes.bfloat16)
driver.memcpy_dtoh(out.ctypes.data, buf + env.rank * part * 2, part * 2, stream)
driver.stream_synchronize(stream)
ref = (np.arange(n, dtype=np.float32)[env.rank * part:(env.rank + 1) * part] * want).astype(ml_dtypes.bfloat16)
ok = bool(np.all(a == want)) and bool(np.allclose(out.astype(np.float32), ref.astype(np.float32), rtol=1e-2))
print(f"rank {env.rank}/{env.world_size} on GPU {gpu} ({dev.name}), NCCL {nccl.version()}: all-reduce "
      f"{a[0]} (want {want}), reduce-scatter {'ok' if ok else 'WRONG'}", flush=True)
comm.close()
sys.exit(0 if ok else 1)
