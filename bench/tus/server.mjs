// tus contender of bench/peers.py: @tus/server with @tus/file-store (no fsync), on loopback.
// Usage: node server.mjs DIRECTORY   -> prints "listening on http://127.0.0.1:PORT"
import http from 'node:http'
import { Server } from '@tus/server'
import { FileStore } from '@tus/file-store'

const tus = new Server({ path: '/files', datastore: new FileStore({ directory: process.argv[2] }) })
const server = http.createServer(tus.handle.bind(tus))
server.keepAliveTimeout = 60000
server.listen(0, '127.0.0.1', () => {
  console.log(`listening on http://127.0.0.1:${server.address().port}`)
})
process.on('SIGTERM', () => process.exit(0))
