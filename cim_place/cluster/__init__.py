"""NATS wiring: envelope, subjects, agent, controller process, block exchange, leader election."""
