"""Routing: the router base, heuristic routers, the engine model behind least_added_time, the router-side prefix index and the look-ahead router."""
