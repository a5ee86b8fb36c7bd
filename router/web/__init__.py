"""The agents' and admins' web app (``sip-router web``): login, the agent's own receive
method, the admins' staff, audit and call pages, and the JSON API behind them.

It reads and writes the same state database as the router and the CLI, through the
same ``PolicyState``, authorization and audit; the router picks its changes up through
the database's change marker within about a second.
"""
