"""What prefill, decode and colocated workers share: the engine thread and the service lifecycle."""
