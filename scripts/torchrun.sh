# Sourced by the start_*.sh launch scripts. `launch SCRIPT FLAGS...` (or `launch -m MODULE FLAGS...`) runs torchrun
# with the node settings taken from the environment: NPROC_PER_NODE (default 1), NNODES (1), NODE_RANK (0),
# MASTER_ADDR (127.0.0.1) and MASTER_PORT (29500). Several nodes: set all five on every node. The repository root is
# put on PYTHONPATH so that the task modules (`-m video_qa.main_task_qa` ...) import from any working directory.
MEMBRIDGE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${MEMBRIDGE_ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
launch() {
    torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "${NPROC_PER_NODE:-1}" \
        --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" "$@"
}
