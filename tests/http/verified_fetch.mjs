// Fetch ipfs://CID through one trustless gateway with @helia/verified-fetch (HTTP-only Helia,
// the gateway as its only recursive gateway, no delegated routers), write the body to OUT and
// print the status. Every block is hash-verified by Helia before verified-fetch uses it.
// Usage: node verified_fetch.mjs GATEWAY_URL CID OUT
import { writeFile } from 'node:fs/promises'
import { withHTTP } from '@helia/http'
import { createVerifiedFetch } from '@helia/verified-fetch'
import { createHeliaLight } from 'helia'

const [gateway, cid, out] = process.argv.slice(2)
const helia = withHTTP(createHeliaLight(), {
  delegatedRouters: [],
  recursiveGateways: [gateway],
  allowInsecure: true,
  allowLocal: true
})
// Helia's routing asks its ordinary routers before the fallback (gateway) routers and, with no
// ordinary router at all, waits forever: give it one that knows nobody (no delegated router, so
// nothing leaves this machine).
helia.addRouter({ name: 'nobody', async * findProviders () {} })
await helia.start()
const verifiedFetch = await createVerifiedFetch(helia)
try {
  const response = await verifiedFetch(`ipfs://${cid}`, { signal: AbortSignal.timeout(60000) })
  const body = new Uint8Array(await response.arrayBuffer())
  await writeFile(out, body)
  console.log(JSON.stringify({ status: response.status, bytes: body.length }))
} catch (err) {
  console.log(JSON.stringify({ error: String(err?.message ?? err) }))
  process.exitCode = 2
} finally {
  await verifiedFetch.stop()
}
