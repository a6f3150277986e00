"""Discrete-event executor for the LeMix scheduler."""
from lemix.sim.simulator import OpExecutor, Simulator, simulate_policy

__all__ = ["OpExecutor", "Simulator", "simulate_policy"]
