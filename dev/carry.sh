#!/usr/bin/env bash
# Maintainers' script for the workplace's CPU sessions, whose next machine keeps the working tree's
# tracked and untracked files but not the ignored ones (.venv, data/, *.pt): a 200-epoch run takes
# several sessions on the CPU, so its checkpoint travels under a name git does not ignore. Users
# need none of this: their checkpoint.pt stays where it is and `--resume` continues from it.
#
#   bash dev/carry.sh keep RUN_DIR &     # beside a run: copies RUN_DIR/checkpoint.pt to .carry/ after each save
#   bash dev/carry.sh restore RUN_DIR    # next session: puts it back, then `python -m common train ... --resume`
#
# .carry/ is never committed; `git add` the run's history files and run.json, not `-A`.
set -eu
usage() { echo "usage: bash dev/carry.sh keep|restore RUN_DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
run_dir=${2%/}
carried=.carry/$(echo "$run_dir" | tr / _).checkpoint
case "$1" in
keep)
    mkdir -p .carry
    while sleep 60; do
        # checkpoint.pt is replaced atomically, so a copy taken now is one whole checkpoint
        if [ "$run_dir/checkpoint.pt" -nt "$carried" ]; then
            cp -p "$run_dir/checkpoint.pt" "$carried.tmp" && mv "$carried.tmp" "$carried"
        fi
    done ;;
restore)
    [ -f "$carried" ] || { echo "no carried checkpoint $carried" >&2; exit 1; }
    if [ -f "$run_dir/run.lock" ] && kill -0 "$(cat "$run_dir/run.lock")" 2>/dev/null; then
        echo "$run_dir is in use by process $(cat "$run_dir/run.lock"): left as it is" >&2; exit 1
    fi
    if [ "$run_dir/checkpoint.pt" -nt "$carried" ]; then
        echo "$run_dir/checkpoint.pt is newer than $carried: left as it is" >&2; exit 1
    fi
    cp -p "$carried" "$run_dir/checkpoint.pt"
    echo "restored $run_dir/checkpoint.pt from $carried" ;;
*) usage ;;
esac
