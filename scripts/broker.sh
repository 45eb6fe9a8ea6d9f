#!/usr/bin/env bash
# Apache Kafka for development, the demo, the tests and the benchmarks: the broker's jars from
# Maven Central (deploy/kafka/pom.xml), installed once into ~/.cache/sieve/kafka-VERSION, run
# in KRaft combined mode (each node its own controller) with the settings of
# deploy/kafka/server.properties.
#
#   scripts/broker.sh install            fetch the jars (once; Java 17+ and Maven needed)
#   scripts/broker.sh start [PORT]       one node on 127.0.0.1:PORT (default 9092), in the background
#   scripts/broker.sh cluster N [PORT]   N nodes on 127.0.0.1:PORT.. (replication 3, min ISR 2)
#   scripts/broker.sh run PORT DIR       one node in the foreground (exec: the caller's child is
#                                        the JVM), data in DIR; what the test harness starts
#   scripts/broker.sh stop               stop what `start` or `cluster` started (SIGTERM, then KILL)
#   scripts/broker.sh bin                print the directory of the jars (java -cp 'DIR/*' …)
#   scripts/broker.sh version            print the pinned Kafka version
#
# Data lives in $SIEVE_BROKER_DIR (default ~/.cache/sieve/broker); storage is formatted only
# when a node's data directory is new, so a restart keeps topics, records and offsets. The pid
# file names the JVM itself, so SIGKILL and SIGSTOP reach the broker. Heap: $SIEVE_BROKER_HEAP.
set -euo pipefail

KAFKA_VERSION=4.4.0
HERE="$(cd "$(dirname "$0")" && pwd)"
CONF="$HERE/../deploy/kafka"
CACHE="${SIEVE_CACHE:-$HOME/.cache/sieve}"
LIBS="$CACHE/kafka-$KAFKA_VERSION/libs"
RUN="${SIEVE_BROKER_DIR:-$CACHE/broker}"
HEAP="${SIEVE_BROKER_HEAP:--Xms128m -Xmx512m}"

die() { echo "broker: $*" >&2; exit 1; }

need_java() {
  command -v java >/dev/null 2>&1 || die "java not found: Kafka $KAFKA_VERSION needs a JDK or JRE 17+ (apt-get install openjdk-17-jre-headless)"
  local v
  v=$(java -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p')
  [ "${v%%.*}" -ge 17 ] 2>/dev/null || die "java $v found: Kafka $KAFKA_VERSION needs Java 17+"
}

installed() { [ -f "$LIBS/.complete" ]; }

install() {
  need_java
  if installed; then echo "broker: kafka $KAFKA_VERSION already in $LIBS"; return; fi
  command -v mvn >/dev/null 2>&1 || die "mvn not found: installing Kafka from Maven Central needs Maven (apt-get install maven)"
  echo "broker: fetching kafka $KAFKA_VERSION and its runtime dependencies from Maven Central into $LIBS (once)"
  rm -rf "$LIBS.tmp"
  # Maven 3.8 prints colour resets even with -q -B: strip escapes and empty lines.
  mvn -q -B -f "$CONF/pom.xml" dependency:copy-dependencies -DincludeScope=runtime \
    -DoutputDirectory="$LIBS.tmp" -Dkafka.version="$KAFKA_VERSION" 2>&1 \
    | sed -e 's/\x1b\[[0-9;]*m//g' -e '/^$/d' \
    || die "maven could not fetch kafka $KAFKA_VERSION (see its output above)"
  rm -rf "$LIBS" && mv "$LIBS.tmp" "$LIBS" && touch "$LIBS/.complete"
}

port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# render NODE PORT CONTROLLER_PORT VOTERS DATA_DIR REPLICATION MIN_ISR: the node's properties.
render() {
  sed -e "s|@NODE_ID@|$1|g; s|@PORT@|$2|g; s|@CONTROLLER_PORT@|$3|g; s|@VOTERS@|$4|g" \
      -e "s|@DATA_DIR@|$5|g; s|@REPLICATION@|$6|g; s|@MIN_ISR@|$7|g" "$CONF/server.properties"
}

# The JVM's command line; the classpath stays one quoted word (no glob expansion by bash).
read -r -a HEAP_FLAGS <<<"$HEAP"
JAVA=(java "${HEAP_FLAGS[@]}" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true
  "-Dlog4j2.configurationFile=$CONF/log4j2.yaml" -cp "$LIBS/*")

# node DIR NODE PORT CONTROLLER_PORT VOTERS REPLICATION MIN_ISR CLUSTER_ID: writes the
# properties and formats the storage unless DIR already holds a formatted node.
prepare() {
  local dir=$1 cluster_id=$8
  mkdir -p "$dir"
  render "$2" "$3" "$4" "$5" "$dir/data" "$6" "$7" >"$dir/server.properties"
  if [ -f "$dir/data/meta.properties" ]; then return; fi
  if [ -d "$dir/data" ] && [ -n "$(ls -A "$dir/data")" ]; then
    die "$dir/data holds files but no meta.properties: not a Kafka data directory (move it away or delete it)"
  fi
  "${JAVA[@]}" kafka.tools.StorageTool format -t "$cluster_id" -c "$dir/server.properties" \
    >"$dir/format.log" 2>&1 || die "formatting $dir/data failed: $(tail -1 "$dir/format.log")"
}

# A cluster id as `kafka-storage random-uuid` makes one (16 random bytes, base64url, not
# starting with '-'), without a JVM start.
cluster_id() {
  python3 -c 'import base64, os
while (i := base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")).startswith("-"): pass
print(i)'
}

# A node's meta.properties that Kafka refuses makes it exit during start: name the cause.
started_or_die() {
  local dir=$1 port=$2 pid
  pid=$(cat "$dir/pid")
  for _ in $(seq 1 600); do
    port_taken "$port" && return
    if ! kill -0 "$pid" 2>/dev/null; then
      local why
      # The exception line names the cause ("node ID not found in …"); the ERROR line only
      # says that the JVM exits.
      why=$(grep -m1 -E '^[A-Za-z0-9_.$]+(Exception|Error)(: |$)' "$dir/broker.log" \
        || grep -m1 ERROR "$dir/broker.log" || tail -1 "$dir/broker.log")
      die "node on port $port exited during start: $why (log: $dir/broker.log)"
    fi
    sleep 0.1
  done
  die "node on port $port did not listen within 60 s (log: $dir/broker.log)"
}

# launch DIR PORT: the JVM in the background; the pid file names the JVM itself.
launch() {
  local dir=$1 port=$2
  (exec nohup "${JAVA[@]}" kafka.Kafka "$dir/server.properties" >>"$dir/broker.log" 2>&1) &
  echo $! >"$dir/pid"
  started_or_die "$dir" "$port"
}

running() { [ -f "$1/pid" ] && kill -0 "$(cat "$1/pid")" 2>/dev/null; }

check_ports() { for p in "$@"; do port_taken "$p" && die "port $p on 127.0.0.1 is taken: stop what listens there or pick another port"; done; return 0; }

numeric() { [[ "$1" =~ ^[0-9]+$ ]] || die "$2 must be a number, got '$1'"; }

start() {
  local port="${1:-9092}"
  numeric "$port" "PORT"
  need_java
  installed || install
  local dir="$RUN/node-1"
  if running "$dir"; then echo "broker: already running (pid $(cat "$dir/pid"))"; return; fi
  local ctrl=$((port + 1))
  check_ports "$port" "$ctrl"
  local id
  id=$(cat "$RUN/cluster-id" 2>/dev/null || true)
  [ -n "$id" ] || { mkdir -p "$RUN"; id=$(cluster_id); echo "$id" >"$RUN/cluster-id"; }
  prepare "$dir" 1 "$port" "$ctrl" "1@127.0.0.1:$ctrl" 1 1 "$id"
  launch "$dir" "$port"
  echo "broker: kafka $KAFKA_VERSION listening on 127.0.0.1:$port (pid $(cat "$dir/pid"), data $dir/data)"
}

# Nodes 1..N: client ports PORT..PORT+N-1, controller ports PORT+N..PORT+2N-1.
cluster() {
  local n="${1:-3}" port="${2:-9092}"
  numeric "$n" "N"; numeric "$port" "PORT"
  [ "$n" -ge 1 ] || die "a cluster needs at least one node"
  need_java
  installed || install
  local repl=$(( n < 3 ? n : 3 )) isr=$(( n < 3 ? 1 : 2 )) voters="" i
  for i in $(seq 1 "$n"); do voters="$voters${voters:+,}$i@127.0.0.1:$((port + n + i - 1))"; done
  for i in $(seq 1 "$n"); do running "$RUN/node-$i" || check_ports $((port + i - 1)) $((port + n + i - 1)); done
  local id
  id=$(cat "$RUN/cluster-id" 2>/dev/null || true)
  [ -n "$id" ] || { mkdir -p "$RUN"; id=$(cluster_id); echo "$id" >"$RUN/cluster-id"; }
  for i in $(seq 1 "$n"); do
    prepare "$RUN/node-$i" "$i" $((port + i - 1)) $((port + n + i - 1)) "$voters" "$repl" "$isr" "$id"
  done
  # Every controller must be up for the quorum to elect a leader: launch all, then wait.
  for i in $(seq 1 "$n"); do
    running "$RUN/node-$i" && continue
    (exec nohup "${JAVA[@]}" kafka.Kafka "$RUN/node-$i/server.properties" >>"$RUN/node-$i/broker.log" 2>&1) &
    echo $! >"$RUN/node-$i/pid"
  done
  for i in $(seq 1 "$n"); do started_or_die "$RUN/node-$i" $((port + i - 1)); done
  local list=""
  for i in $(seq 1 "$n"); do list="$list${list:+,}127.0.0.1:$((port + i - 1))"; done
  echo "broker: kafka $KAFKA_VERSION cluster of $n on $list (replication $repl, min ISR $isr, data $RUN)"
}

# A formatted one-node data directory, made by the first `run` and copied by the next ones:
# formatting starts a JVM (2-3 s), a copy does not. Separate one-node clusters may share
# their cluster and directory ids; they never talk to each other.
TEMPLATE="$CACHE/kafka-$KAFKA_VERSION/run-node-template"

# Foreground node for a supervisor (the test harness): formats DIR when new, then becomes the JVM.
run() {
  [ $# -ge 2 ] || die "usage: broker.sh run PORT DIR [CONTROLLER_PORT]"
  local port=$1 dir=$2 ctrl="${3:-}"
  numeric "$port" "PORT"
  need_java
  installed || die "kafka $KAFKA_VERSION is not installed: run scripts/broker.sh install"
  if [ -z "$ctrl" ]; then ctrl=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'); fi
  check_ports "$port" "$ctrl"
  local fresh=0
  if [ ! -e "$dir/data" ]; then
    fresh=1
    mkdir -p "$dir"
    [ -f "$TEMPLATE/meta.properties" ] && cp -r "$TEMPLATE" "$dir/data"
  fi
  prepare "$dir" 1 "$port" "$ctrl" "1@127.0.0.1:$ctrl" 1 1 "$(cluster_id)"
  if [ $fresh = 1 ] && [ ! -f "$TEMPLATE/meta.properties" ]; then
    local t
    t=$(mktemp -d "$TEMPLATE.XXXXXX")
    cp -r "$dir/data/." "$t/"
    mv -T "$t" "$TEMPLATE" 2>/dev/null || rm -rf "$t"
  fi
  exec "${JAVA[@]}" kafka.Kafka "$dir/server.properties"
}

stop() {
  local pids=() f
  for f in "$RUN"/node-*/pid; do
    [ -f "$f" ] || continue
    kill -0 "$(cat "$f")" 2>/dev/null && pids+=("$(cat "$f")")
    rm -f "$f"
  done
  [ ${#pids[@]} -gt 0 ] || return 0
  kill "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 1 300); do
    local alive=0 p
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && return 0
    sleep 0.1
  done
  kill -9 "${pids[@]}" 2>/dev/null || true
}

case "${1:-}" in
  install) install ;;
  start) shift; start "$@" ;;
  cluster) shift; cluster "$@" ;;
  run) shift; run "$@" ;;
  stop) stop ;;
  bin) echo "$LIBS" ;;
  version) echo "$KAFKA_VERSION" ;;
  *) echo "usage: $0 install | start [PORT] | cluster N [PORT] | run PORT DIR | stop | bin | version" >&2; exit 2 ;;
esac
