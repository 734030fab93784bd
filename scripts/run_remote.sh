#!/usr/bin/env bash
# Train on a remote GPU machine: sync the code (and optionally a dataset) over ssh, start
# `accelerate launch scripts/train.py` there under nohup (or tmux), then follow its log.
# See `scripts/run_remote.sh --help` and docs/visualization.md.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/run_remote.sh [options] [--] [scripts/train.py arguments...]

Sync this repository to HOST, start training there in the background, and follow the log.

  --host HOST               ssh destination (user@host or an ~/.ssh/config alias);
                            default: $PROTODEPTH_REMOTE_HOST
  --remote-dir DIR          code folder on HOST, absolute or relative to the remote home
                            (default: $PROTODEPTH_REMOTE_DIR or "protodepth")
  --accelerate-config FILE  accelerate config for `accelerate launch --config_file`; a local file
                            is synced along (inside the repo: with the code; elsewhere: to
                            DIR/.remote_configs/), any other value is taken as a path on HOST.
                            Default: HOST's default accelerate config.
  --data DIR                also sync this local dataset folder, and pass
                            data.source=synthia data.root=<its remote path> to train.py
                            (unless you pass data.source= / data.root= yourself)
  --remote-data PATH        where --data goes on HOST; relative paths are relative to the code
                            folder (default: data/<name of DIR>)
  --venv PATH               remote virtualenv to activate, relative to the code folder or absolute
                            (default: .venv, activated when it exists)
  --setup CMD               run CMD in the code folder before training (e.g. 'pip install -e .')
  --name NAME               run name: log DIR/logs/NAME.log, launcher DIR/logs/NAME.sh
                            (default: run-<UTC date and time>)
  --tmux                    start inside a detached tmux session (named NAME) instead of nohup
  --no-follow               do not follow the log after starting
  --ssh-opt OPT             extra option for ssh (repeatable), e.g. --ssh-opt -p --ssh-opt 2222
  --dry-run                 print every command instead of running it
  -h, --help                show this help

Everything after `--` (or from the first argument that is not an option above) goes to
scripts/train.py unchanged, e.g.:

  PROTODEPTH_REMOTE_HOST=gpu1 scripts/run_remote.sh --accelerate-config accel.yaml \
      --data ~/SYNTHIA-SF -- --config configs/original.yaml train.max_steps=20000

Stopping the log (Ctrl-C) leaves training running; the script prints how to re-attach.
EOF
}

die() { echo "run_remote.sh: error: $*" >&2; exit 2; }

SAFE_WORD='^[A-Za-z0-9_./:=@%+,~-]+$'

# Quote one word for a POSIX shell: plain words as they are, anything else in single quotes.
rq() {
    if [[ "$1" =~ $SAFE_WORD ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

# A command as it could be pasted into a shell.
fmt() {
    local out="" a
    for a in "$@"; do out+="${out:+ }$(rq "$a")"; done
    printf '%s' "$out"
}

show() { echo "+ $(fmt "$@")"; }

run() {
    show "$@"
    if [[ $DRY_RUN -eq 0 ]]; then "$@"; fi
}

HOST="${PROTODEPTH_REMOTE_HOST:-}"
REMOTE_DIR="${PROTODEPTH_REMOTE_DIR:-protodepth}"
ACCEL_CONFIG=""
DATA=""
REMOTE_DATA=""
VENV=".venv"
SETUP=""
NAME="run-$(date -u +%Y%m%d-%H%M%S)"
USE_TMUX=0
FOLLOW=1
DRY_RUN=0
SSH_OPTS=()
TRAIN_ARGS=()

need() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see --help)"; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --host) need "$@"; HOST="$2"; shift 2 ;;
        --remote-dir) need "$@"; REMOTE_DIR="$2"; shift 2 ;;
        --accelerate-config) need "$@"; ACCEL_CONFIG="$2"; shift 2 ;;
        --data) need "$@"; DATA="$2"; shift 2 ;;
        --remote-data) need "$@"; REMOTE_DATA="$2"; shift 2 ;;
        --venv) need "$@"; VENV="$2"; shift 2 ;;
        --setup) need "$@"; SETUP="$2"; shift 2 ;;
        --name) need "$@"; NAME="$2"; shift 2 ;;
        --tmux) USE_TMUX=1; shift ;;
        --no-follow) FOLLOW=0; shift ;;
        --ssh-opt) need "$@"; SSH_OPTS+=("$2"); shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        --) shift; TRAIN_ARGS+=("$@"); break ;;
        -*) die "unknown option $1; put scripts/train.py arguments after --" ;;
        *) TRAIN_ARGS+=("$@"); break ;;
    esac
done

[[ -n "$HOST" ]] || die "no host given: pass --host HOST or set PROTODEPTH_REMOTE_HOST"
[[ "$HOST" != -* ]] || die "--host $HOST: a host name cannot start with '-'"
[[ "$NAME" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--name $NAME: use letters, digits, '.', '_' and '-' only"
REMOTE_DIR="${REMOTE_DIR%/}"
[[ -n "$REMOTE_DIR" ]] || die "--remote-dir must not be empty or /"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[[ -f "$REPO/scripts/train.py" ]] || die "cannot find scripts/train.py next to this script ($REPO)"

if [[ $DRY_RUN -eq 0 ]]; then
    command -v ssh >/dev/null || die "ssh not found on this machine"
    command -v rsync >/dev/null || die "rsync not found on this machine (install it here and on $HOST)"
fi

SSH=(ssh ${SSH_OPTS[@]+"${SSH_OPTS[@]}"})
RSYNC_SSH="ssh${SSH_OPTS[*]+ ${SSH_OPTS[*]}}"
RSYNC=(rsync -az --partial -e "$RSYNC_SSH")
LOG_DIR="$REMOTE_DIR/logs"
LOG="$LOG_DIR/$NAME.log"
LAUNCHER="$LOG_DIR/$NAME.sh"

# ---- the accelerate config: synced with the code, copied separately, or already on the host
ACCEL_REMOTE=""        # the path accelerate sees (relative to the code folder, or absolute)
ACCEL_COPY_SRC=""      # a local file outside the repo, to copy to the host
if [[ -n "$ACCEL_CONFIG" ]]; then
    if [[ -f "$ACCEL_CONFIG" ]]; then
        abs="$(cd "$(dirname "$ACCEL_CONFIG")" && pwd)/$(basename "$ACCEL_CONFIG")"
        if [[ "$abs" == "$REPO/"* ]]; then
            ACCEL_REMOTE="${abs#"$REPO/"}"
        else
            ACCEL_COPY_SRC="$abs"
            ACCEL_REMOTE=".remote_configs/$(basename "$abs")"
        fi
    else
        echo "note: $ACCEL_CONFIG is not a local file; using it as a path on $HOST" >&2
        ACCEL_REMOTE="$ACCEL_CONFIG"
    fi
fi

# ---- the dataset
if [[ -n "$DATA" ]]; then
    [[ -d "$DATA" ]] || die "--data $DATA: folder not found"
    DATA="$(cd "$DATA" && pwd)"
    [[ -n "$REMOTE_DATA" ]] || REMOTE_DATA="data/$(basename "$DATA")"
    if [[ "$REMOTE_DATA" == /* ]]; then DATA_DEST="$REMOTE_DATA"; else DATA_DEST="$REMOTE_DIR/$REMOTE_DATA"; fi
    has_source=0; has_root=0
    for a in ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}; do
        [[ "$a" == data.source=* ]] && has_source=1
        [[ "$a" == data.root=* ]] && has_root=1
    done
    [[ $has_source -eq 1 ]] || TRAIN_ARGS+=("data.source=synthia")
    [[ $has_root -eq 1 ]] || TRAIN_ARGS+=("data.root=$REMOTE_DATA")
elif [[ -n "$REMOTE_DATA" ]]; then
    die "--remote-data needs --data (the local folder to sync)"
fi

# ---- the launcher script that runs on the host (kept in the log folder, next to the log)
launch_cmd="accelerate launch"
[[ -n "$ACCEL_REMOTE" ]] && launch_cmd+=" --config_file $(rq "$ACCEL_REMOTE")"
launch_cmd+=" scripts/train.py"
for a in ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}; do launch_cmd+=" $(rq "$a")"; done
LAUNCHER_TEXT="#!/usr/bin/env bash
# written by scripts/run_remote.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ)
set -e
cd
cd $(rq "$REMOTE_DIR")
if [ -f $(rq "$VENV/bin/activate") ]; then . $(rq "$VENV/bin/activate"); fi
export PYTHONUNBUFFERED=1"
[[ -n "$SETUP" ]] && LAUNCHER_TEXT+="
$SETUP"
LAUNCHER_TEXT+="
exec $launch_cmd"

echo "== host $HOST, code folder $REMOTE_DIR, run $NAME"

# 1. folders, code, config, data
run "${SSH[@]}" "$HOST" "mkdir -p $(rq "$LOG_DIR")"
run "${RSYNC[@]}" --exclude=runs/ --exclude=.venv/ --exclude=wandb/ --exclude=data_cache/ --exclude=.git/ \
    --exclude=__pycache__/ --exclude=.pytest_cache/ --exclude='*.egg-info/' \
    "$REPO/" "$HOST:$REMOTE_DIR/"
if [[ -n "$ACCEL_COPY_SRC" ]]; then
    run "${SSH[@]}" "$HOST" "mkdir -p $(rq "$REMOTE_DIR/.remote_configs")"
    run "${RSYNC[@]}" "$ACCEL_COPY_SRC" "$HOST:$REMOTE_DIR/$ACCEL_REMOTE"
fi
if [[ -n "$DATA" ]]; then
    run "${SSH[@]}" "$HOST" "mkdir -p $(rq "$DATA_DEST")"
    run "${RSYNC[@]}" --info=progress2 "$DATA/" "$HOST:$DATA_DEST/"
fi

# 2. the launcher, then start it detached
echo "+ $(fmt "${SSH[@]}" "$HOST" "cat > $(rq "$LAUNCHER")") <<'LAUNCHER'"
echo "$LAUNCHER_TEXT"
echo "LAUNCHER"
if [[ $DRY_RUN -eq 0 ]]; then
    printf '%s\n' "$LAUNCHER_TEXT" | "${SSH[@]}" "$HOST" "cat > $(rq "$LAUNCHER")"
fi
if [[ $USE_TMUX -eq 1 ]]; then
    inner="bash $(rq "$LAUNCHER") 2>&1 | tee $(rq "$LOG")"
    run "${SSH[@]}" "$HOST" "cd && tmux new-session -d -s $(rq "$NAME") $(rq "$inner")"
    reattach="ssh -t $HOST tmux attach -t $NAME"
else
    run "${SSH[@]}" "$HOST" "cd && nohup bash $(rq "$LAUNCHER") > $(rq "$LOG") 2>&1 < /dev/null & echo \$! > $(rq "$LOG_DIR/$NAME.pid")"
    reattach="ssh $HOST tail -F $LOG   (stop: ssh $HOST 'kill \$(cat $LOG_DIR/$NAME.pid)')"
fi

# 3. follow the log
echo "== started; re-attach with: $reattach"
if [[ $FOLLOW -eq 1 ]]; then
    run "${SSH[@]}" -t "$HOST" "cd && tail -n +1 -F $(rq "$LOG")"
fi
