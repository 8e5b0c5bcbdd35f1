//! gateway-sim: faulty RDP targets, a simulated directory and a gateway driver.
