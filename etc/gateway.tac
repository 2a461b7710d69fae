# The same service for `.venv/bin/twistd --pidfile=var/gateway.pid -ny etc/gateway.tac`;
# edit the options to taste.
from twisted.application.service import Application

from gateway.tap import Options, makeService

options = Options()
options.parseOptions(["--listen", "tcp:8080", "--database", "sqlite:var/gateway.sqlite"])
application = Application("gateway")
makeService(options).setServiceParent(application)
