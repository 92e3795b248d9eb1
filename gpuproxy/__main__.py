from gpuproxy.cli import main

main()
