from gateway.supervisor.process import State
from gateway.supervisor.supervisor import Backend, Supervisor

__all__ = ["Backend", "State", "Supervisor"]
