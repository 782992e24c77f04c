"""What a person starts: the CLI, the HTTP gateway, the laptop stack and its child processes."""
