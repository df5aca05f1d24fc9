"""The wabridge controller: control plane -> systemd units, and worker reports -> control plane."""
