# The steps every training job script takes, sourced by train_1node.sbatch and train_multinode.sbatch
# (from the submit directory: sbatch runs a copy of the job script, not the file beside this one).

# The first host of the allocation as SLURM names it: scontrol expands node[01-04]-ib to node01-ib ...
first_host() {
    scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1
}

# The dry run in every task (each prints its own rank; rank 0's lines are shown). Its exit status, not
# that of a pager, decides: a failing dry run stops the job before any GPU hour is spent.
dry_run() {
    local out rc
    out=$(srun "$@" --dry-run 2>&1)
    rc=$?
    printf '%s\n' "$out" | head -n 8
    if [ "$rc" -ne 0 ]; then
        printf '%s\n' "$out" | grep -v '^\[' | tail -n 3 >&2
        echo "the dry run failed (exit status $rc): the job stops before training" >&2
        exit "$rc"
    fi
}

# Train; pass the pre-emption signal (--signal=B:TERM reaches this shell only) to srun, which delivers it
# to every task: the trainer checkpoints the current step and exits 75. Only that status requeues the
# job; a crash or a task killed by the OOM killer ends it (requeueing those would repeat them forever).
train_and_requeue() {
    local pid rc preempted=0
    "$@" &
    pid=$!
    trap 'echo "pre-emption signal: asking the tasks to checkpoint"; preempted=1; kill -TERM "$pid"' TERM
    wait "$pid"
    rc=$?
    while [ "$preempted" -eq 1 ] && kill -0 "$pid" 2>/dev/null; do   # the trap interrupted wait: wait for the save
        wait "$pid"
        rc=$?
    done
    if [ "$rc" -eq 75 ]; then
        scontrol requeue "$SLURM_JOB_ID" && echo "pre-empted after a checkpoint: requeued $SLURM_JOB_ID"
    elif [ "$rc" -ne 0 ]; then
        echo "training ended with exit status $rc: not requeued (only a pre-emption, status 75, is)" >&2
    fi
    exit "$rc"
}
