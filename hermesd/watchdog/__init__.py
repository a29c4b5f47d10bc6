"""Watchdog readings (temperature, memory) and the pure policy that turns them into actions."""
