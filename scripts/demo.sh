#!/usr/bin/env bash
# godwit's main job, end to end, on a fresh Debian machine: install what is needed, build
# godwit, and live-migrate a busy VM between two hosts (network namespaces joined by a 1 Gbit/s
# link), printing the migration's figures and the destination guest's own memory check.
#
# On a machine without /dev/kvm the whole run happens inside the nested KVM host (a QEMU TCG VM
# with Debian's kernel and a real /dev/kvm), see tools/kvmhost. Everything there runs under
# emulation, so the figures are far slower than on hardware; compare them as ratios.
#
# Usage: scripts/demo.sh [godwit run flags for the VM...]
#   e.g. scripts/demo.sh --mem 1G --workload dirty --wss 256M --rate max --content random
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${GODWIT_DEMO_INSIDE:-}" != 1 ]; then
	need=()
	command -v go >/dev/null || { echo "demo: Go is needed (https://go.dev/dl)"; exit 1; }
	command -v ip >/dev/null || need+=(iproute2)
	command -v tc >/dev/null || need+=(iproute2)
	command -v nsenter >/dev/null || need+=(util-linux)
	if [ ${#need[@]} -gt 0 ]; then
		apt-get update -qq && apt-get install -y -qq "${need[@]}"
	fi
	mkdir -p bin
	go build -o bin/godwit ./cmd/godwit
	go build -o bin/kvmhost ./tools/kvmhost
	# kvmhost runs the command directly when /dev/kvm works here, in a nested KVM host if not.
	exec env GODWIT_DEMO_INSIDE=1 bin/kvmhost -- "$PWD/scripts/demo.sh" "$@"
fi

G="$PWD/bin/godwit"
run=$(mktemp -d /run/godwit-demo.XXXXXX)
A=godwit-demo-a B=godwit-demo-b
cleanup() {
	"$G" quit --control "$run/dst.sock" >/dev/null 2>&1 || true
	"$G" quit --control "$run/src.sock" >/dev/null 2>&1 || true
	ip netns del $A 2>/dev/null || true
	ip netns del $B 2>/dev/null || true
	wait 2>/dev/null || true
	rm -rf "$run"
}
trap cleanup EXIT

# Two hosts: namespaces A and B, a veth pair between them, shaped to 1 Gbit/s each way.
ip netns add $A
ip netns add $B
ip link add veth-demo-a netns $A type veth peer name veth-demo-b netns $B
ip -n $A addr add 10.231.0.1/24 dev veth-demo-a
ip -n $B addr add 10.231.0.2/24 dev veth-demo-b
for ns in $A $B; do ip -n $ns link set lo up; done
ip -n $A link set veth-demo-a up
ip -n $B link set veth-demo-b up
tc -n $A qdisc add dev veth-demo-a root tbf rate 1gbit burst 256kb latency 50ms
tc -n $B qdisc add dev veth-demo-b root tbf rate 1gbit burst 256kb latency 50ms

vm=("$@")
[ ${#vm[@]} -gt 0 ] || vm=(--mem 512M --vcpus 2 --workload dirty --wss 128M --rate 20k --pattern hotcold --content text)
echo "== host A: godwit run ${vm[*]}"
ip netns exec $A "$G" run --name demo --control "$run/src.sock" "${vm[@]}" >"$run/src.log" 2>&1 &
echo "== host B: godwit run --incoming tcp:10.231.0.2:7000"
ip netns exec $B "$G" run --name demo --incoming tcp:10.231.0.2:7000 --control "$run/dst.sock" >"$run/dst.log" 2>&1 &
for s in src dst; do
	for _ in $(seq 600); do [ -S "$run/$s.sock" ] && break; sleep 0.1; done
done
sleep 2
"$G" stats --control "$run/src.sock"
echo
echo "== godwit migrate --to tcp:10.231.0.2:7000 --auto-converge"
"$G" migrate --control "$run/src.sock" --to tcp:10.231.0.2:7000 --auto-converge
echo
echo "== on host B, the guest checks every page it owns"
sleep 1
"$G" verify --control "$run/dst.sock"
"$G" stats --control "$run/dst.sock"
