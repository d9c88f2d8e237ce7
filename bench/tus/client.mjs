// tus contender of bench/peers.py and bench/cards.py, with tus-js-client.
// Usage: node client.mjs ENDPOINT BACKLOG_DIR COUNT CONCURRENCY
//          one upload per chunk file BACKLOG_DIR/<i>.bin, CONCURRENCY at once (peers.py)
//        node client.mjs --files ENDPOINT LIST_FILE CONCURRENCY CHUNK_SIZE
//          one upload per whole file named in LIST_FILE (one path a line), read from disk in
//          requests of CHUNK_SIZE bytes, CONCURRENCY files at once (cards.py)
import { createReadStream } from 'node:fs'
import { readFile } from 'node:fs/promises'
import * as tus from 'tus-js-client'

function upload (endpoint, data, options) {
  return new Promise((resolve, reject) => {
    const up = new tus.Upload(data, { endpoint, retryDelays: null, onError: reject, onSuccess: resolve, ...options })
    up.start()
  })
}

async function pool (count, concurrency, task) {
  let next = 0
  async function worker () {
    while (next < count) await task(next++)
  }
  await Promise.all(Array.from({ length: concurrency }, worker))
}

if (process.argv[2] === '--files') {
  const [endpoint, list, concurrency, chunkSize] = [process.argv[3], process.argv[4], Number(process.argv[5]), Number(process.argv[6])]
  const paths = (await readFile(list, 'utf8')).split('\n').filter(Boolean)
  await pool(paths.length, concurrency, async (index) => {
    const path = paths[index]
    await upload(endpoint, createReadStream(path), { chunkSize, metadata: { filename: path } })
  })
} else {
  const [endpoint, dir, count, concurrency] = [process.argv[2], process.argv[3], Number(process.argv[4]), Number(process.argv[5])]
  await pool(count, concurrency, async (index) => {
    const data = await readFile(`${dir}/${index}.bin`)
    await upload(endpoint, data, { uploadSize: data.length, metadata: { filename: `${index}.bin` } })
  })
}
