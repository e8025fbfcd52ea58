# Shell functions the benchmark scripts share (sourced, not run).

# Prints N distinct free loopback ports (all bound at once, so none repeats).
free_ports() {
    python3 -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
' "$1"
}
