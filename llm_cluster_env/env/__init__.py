"""The Gymnasium environment: observation builder, reward, LLMClusterEnv, scenario families and capacity measurement."""
