# Login banner of the ditto appliance: the daemon's state, its status and the management addresses.
case $- in *i*) ;; *) return 0 2>/dev/null || exit 0 ;; esac
[ -x /usr/bin/ditto ] || return 0
printf '\n== ditto appliance (%s) ==\n' "$(hostname)"
printf 'ditto.service: %s   bridge: %s\n' "$(systemctl is-active ditto.service 2>/dev/null)" \
  "$(for i in lan0 wan0; do printf '%s %s  ' "$i" "$(cat /sys/class/net/$i/operstate 2>/dev/null || echo missing)"; done)"
printf 'management (br0): %s\n' "$(ip -br addr show dev br0 2>/dev/null | cut -d' ' -f2- | tr -s ' ')"
timeout 3 /usr/bin/ditto status 2>&1 | sed 's/^/  /'
printf 'config: /etc/ditto/ditto.toml   logs: journalctl -u ditto   fingerprint: ditto fingerprint /var/lib/ditto/node.key\n\n'
