from expertmesh.node.cli import main

main()
